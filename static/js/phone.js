// The payment rules the server applies (mpesa.py), repeated here so the pages can say
// what is wrong before anything is sent, plus how the pages write numbers and money.

const SEPARATORS = /[\s\-().]/g;
// Safaricom numbers: 07XX XXX XXX, and since 2020 010X / 011X XXX XXX.
const SHAPES = [/^\+?254(7\d{8}|1[01]\d{7})$/, /^0(7\d{8}|1[01]\d{7})$/, /^(7\d{8}|1[01]\d{7})$/];

/** Return the number as 2547XXXXXXXX / 2541XXXXXXXX, or null when it is not one. */
export function normalisePhone(raw) {
  const text = String(raw ?? "").trim().replace(SEPARATORS, "");
  for (const shape of SHAPES) {
    const match = shape.exec(text);
    if (match) return "254" + match[1];
  }
  return null;
}

/** 254712345678 -> "0712 345 678", the way Kenyans write their numbers. */
export function localPhone(normalised) {
  const rest = String(normalised).slice(3);
  return `0${rest.slice(0, 3)} ${rest.slice(3, 6)} ${rest.slice(6)}`;
}

export const PHONE_ERROR = "Enter an M-Pesa number such as 0712 345 678 or +254 712 345 678.";

/** Check an amount the way the server does: whole KES from 1 to max. */
export function checkAmount(raw, max) {
  const text = String(raw ?? "").trim();
  if (text === "") return { error: "Enter the amount to pay." };
  if (!/^\d{1,12}$/.test(text)) return { error: "Enter a whole number of shillings, without cents." };
  const value = Number(text);
  if (value < 1) return { error: "The amount must be at least KES 1." };
  if (value > max) return { error: `The amount must not be more than ${formatKes(max)}.` };
  return { value };
}

const KES = new Intl.NumberFormat("en-KE", { maximumFractionDigits: 0 });
const KES_CENTS = new Intl.NumberFormat("en-KE", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const USD = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });

/** 1500 -> "KES 1,500" (cents: "KES 1,500.00"). */
export function formatKes(amount, { cents = false } = {}) {
  return "KES " + (cents ? KES_CENTS : KES).format(Number(amount));
}

/** The approximate US dollar value of a KES amount, or "" without a rate. */
export function approxUsd(kes, rate) {
  if (!rate || !(kes > 0)) return "";
  return "≈ " + USD.format(kes / rate);
}
